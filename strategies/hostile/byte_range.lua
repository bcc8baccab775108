-- string.byte over a whole long string, in a loop.
return { plan = function(ctx)
    local s = string.rep('x', 200000)
    while true do
        local n = select('#', s:byte(1, -1))
    end
end }
