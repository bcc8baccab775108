-- utf8.len of a long string, in a loop.
return { plan = function(ctx)
    local s = string.rep('x', 1 << 21)
    while true do
        local n = utf8.len(s)
    end
end }
