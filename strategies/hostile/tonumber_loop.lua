-- tonumber of a long string of spaces, in a loop.
return { plan = function(ctx)
    local s = string.rep(' ', 1 << 21)
    while true do
        local n = tonumber(s)
    end
end }
